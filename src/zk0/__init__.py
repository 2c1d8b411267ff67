"""zk0: federated learning of SmolVLA robot policies with Flower and LeRobot."""
