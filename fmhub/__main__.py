from fmhub.cli import main

main()
