import sys

from trainer.worker.main import main

sys.exit(main())
