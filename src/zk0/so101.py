"""SO-100/SO-101 dataset conventions zk0 records and its locally built policies expect.

Kept apart from the simulator so that building a policy never imports MuJoCo.
"""

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
FPS = 30
ROBOT_TYPE = "so101_follower"
CAMERAS = ("front", "wrist")


def features(image_size: int) -> dict:
    """LeRobot feature spec: SO-100/SO-101 joint names (``.pos``), two video cameras."""
    names = [f"{j}.pos" for j in JOINTS]
    spec = {
        "observation.state": {"dtype": "float32", "shape": (len(JOINTS),), "names": names},
        "action": {"dtype": "float32", "shape": (len(JOINTS),), "names": names},
    }
    for cam in CAMERAS:
        spec[f"observation.images.{cam}"] = {
            "dtype": "video", "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channels"]}
    return spec
