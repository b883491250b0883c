from mergetune.cli.main import main

main()
