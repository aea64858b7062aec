"""sources.PrometheusReader against a real Prometheus (the binary `make cluster-build` builds):
values, labelled values, no data, a PromQL Prometheus refuses, and a Prometheus that is not there."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from e2e.harness import eventually

from tars_localcluster.config import cached_tool
from tars_operator.sources import PrometheusReader, QueryResult


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = cached_tool("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: run `make cluster-build`, which builds it", pytrace=False)
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text("global: {scrape_interval: 1m}\n")
    url = f"http://127.0.0.1:{_free_port()}"
    server = subprocess.Popen(
        [
            str(binary),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "log").open("w"),
    )

    def ready() -> bool:
        assert server.poll() is None, f"prometheus exited: {(tmp / 'log').read_text()[-2000:]}"
        return _ready(url)

    try:
        eventually(ready, 60, "prometheus ready")
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).is_success
    except httpx.HTTPError:
        return False


@pytest.fixture
async def reader(prometheus_url: str) -> AsyncIterator[PrometheusReader]:
    prometheus = PrometheusReader(prometheus_url)
    yield prometheus
    await prometheus.close()


async def test_a_value_comes_back_as_a_sample_with_its_time(reader: PrometheusReader) -> None:
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    result = await reader.query("vector(42)")
    assert result.error is None and result.sample is not None
    assert result.sample.value == 42.0 and result.sample.at >= before
    scalar = await reader.query("scalar(vector(7))")
    assert scalar.sample is not None and scalar.sample.value == 7.0


async def test_no_series_and_nan_are_no_value_not_an_error(reader: PrometheusReader) -> None:
    assert await reader.query('tars_queue_depth{pool="none"}') == QueryResult(None, None)
    assert await reader.query("vector(0) / 0") == QueryResult(None, None)


async def test_a_query_prometheus_refuses_names_the_query_and_prometheus_own_words(
    reader: PrometheusReader, prometheus_url: str
) -> None:
    result = await reader.query("sum(rate(tars_queue_depth[1m])")
    assert result.sample is None and result.error is not None
    assert "'sum(rate(tars_queue_depth[1m])'" in result.error and prometheus_url in result.error
    assert "HTTP 400 bad_data" in result.error and "parse error" in result.error


async def test_an_unreachable_prometheus_is_an_error_that_names_it() -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    reader = PrometheusReader(url, timeout=2.0)
    try:
        result = await reader.query("vector(1)")
        assert await reader.query_by_label('label_replace(vector(1), "stat", "a", "", "")', "stat") == {}
    finally:
        await reader.close()
    assert result.sample is None and result.error is not None
    assert url in result.error and "ConnectError" in result.error


async def test_a_labelled_query_returns_each_series_under_its_label(reader: PrometheusReader) -> None:
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    promql = (
        'label_replace(vector(3), "stat", "a", "", "") or label_replace(vector(4), "stat", "b", "", "")'
        ' or vector(5) or label_replace(vector(0) / 0, "stat", "nan", "", "")'
    )
    samples = await reader.query_by_label(promql, "stat")
    # The unlabelled series and the NaN are left out: nothing there to use.
    assert {stat: s.value for stat, s in samples.items()} == {"a": 3.0, "b": 4.0}
    assert all(s.at >= before for s in samples.values())
    assert await reader.query_by_label("sum(rate(x[1m])", "stat") == {}, "a refused query: no data"
