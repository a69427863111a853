import sys

from headend.web import main

sys.exit(main())
