import sys

from UltramotionIGTLib.tools.cli import main

sys.exit(main())
