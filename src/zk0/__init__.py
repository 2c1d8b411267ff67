"""zk0: federated learning of SmolVLA robot policies with Flower and LeRobot."""

import logging

# LeRobot logs at import time through the root logger, which installs a root handler;
# Flower's logger has its own, so without this every Flower line would print twice.
logging.getLogger("flwr").propagate = False
