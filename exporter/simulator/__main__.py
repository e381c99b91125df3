import sys

from exporter.simulator.cli import main

sys.exit(main())
