"""The ``zk0`` command line: :mod:`zk0.cli.app` registers the commands the other modules define."""
