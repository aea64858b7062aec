import sys

from tars_localcluster.cli import main

sys.exit(main())
