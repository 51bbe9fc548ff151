import sys

from distill_bench.cli import main

sys.exit(main())
