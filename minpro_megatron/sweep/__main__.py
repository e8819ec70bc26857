import sys

from minpro_megatron.sweep.command import main

sys.exit(main())
