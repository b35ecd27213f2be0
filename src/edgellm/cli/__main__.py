from edgellm.cli.main import main

main()
