from r1_lightning.cli import main

main()
