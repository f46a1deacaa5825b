import sys

from UltramotionIGTLib.cli import main

sys.exit(main())
