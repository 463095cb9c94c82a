from mistral_lightning.demo.pipeline import main

raise SystemExit(main())
