from mmp.cli import main

main()
