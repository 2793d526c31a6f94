import sys

from tokenreduce.cli import main

sys.exit(main())
