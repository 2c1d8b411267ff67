"""A federation on Flower's Deployment Engine: the operator's and the robot owners' folders, the processes
they run (SuperLink behind the Fleet proxy, supervised SuperNodes and resident ClientApp workers), and
the certificates and keys that tie them together. Nothing in the federated-learning core imports it."""
