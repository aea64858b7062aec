"""spec.redis takes credentials by Secret reference only (issue 8, item 13): an inline URL with a
password would be in every agent pod's env and in the AgentPool object."""

from typing import Any

import pytest
import yaml
from factories import raw_spec

from tars_operator import crd, settings
from tars_operator.models import REDIS_URL_CREDENTIALS
from tars_operator.validation import check


@pytest.mark.parametrize(
    "url",
    ["redis://:s3cret@redis:6379/0", "rediss://tars:s3cret@redis.example:6380/1", "redis://tars@redis/0"],
)
def test_a_redis_url_with_credentials_is_refused_naming_the_fix(url: str) -> None:
    _, problems = check(raw_spec(redis={"url": url}))
    assert [p.field for p in problems] == ["spec.redis"]
    assert REDIS_URL_CREDENTIALS in problems[0].message
    assert "s3cret" not in str(problems[0])


def test_the_password_comes_by_secret_reference() -> None:
    spec, problems = check(
        raw_spec(
            redis={"url": "rediss://redis.example:6380/1", "passwordSecretRef": {"name": "r", "key": "pw"}}
        )
    )
    assert problems == [] and spec is not None and spec.redis is not None
    assert spec.redis.password_secret_ref is not None and spec.redis.password_secret_ref.name == "r"


def test_the_api_server_refuses_it_too() -> None:
    """The same rule as CEL on spec.redis, reported on spec.redis.url."""
    version: dict[str, Any] = yaml.safe_load(crd.render())["spec"]["versions"][0]
    redis = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["redis"]
    assert redis["x-kubernetes-validations"] == [
        {"rule": "!self.url.contains('@')", "message": REDIS_URL_CREDENTIALS, "fieldPath": ".url"}
    ]


def test_the_operators_default_redis_url_may_not_carry_a_password_either(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        settings.parse(["--redis-url=redis://:s3cret@redis:6379/0"])
    error = capsys.readouterr().err
    assert "--redis-url must not contain credentials: set $TARS_REDIS_PASSWORD instead" in error
    assert "s3cret" not in error
