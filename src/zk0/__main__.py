from zk0.cli import main

main()
