import sys

from spd_verl.world.build import main

sys.exit(main())
