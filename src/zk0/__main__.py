from zk0.cli.app import main

main()
