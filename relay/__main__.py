import sys

from relay.launch import main

sys.exit(main())
