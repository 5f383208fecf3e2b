"""A pickle payload that runs a shell command when unpickled: what safe loading must refuse."""

import os


class RunsACommand:
    """Unpickling this object would run `touch <marker>`; tests check the marker never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
