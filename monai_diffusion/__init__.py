"""monai-diffusion: config-driven 3D latent diffusion for medical volumes."""

import re

__version__ = "0.1.0"


def command_description(doc: str) -> str:
    """A command's ``--help`` description: the first line of its module docstring, in plain text.

    ``"``monai-diffusion plan``: predict ... (:mod:`~a.b`)"`` -> ``"Predict ... (b)"``: the leading command name goes
    (the usage line shows it), reST roles become their target (``~`` keeps its last part) and literals their text.
    """
    line = doc.strip().splitlines()[0]
    line = re.sub(r"^``monai-diffusion [^`]*``:\s*", "", line)
    line = re.sub(r":[a-z]+:`(~?)([^`]*)`", lambda m: m[2].rpartition(".")[2] if m[1] else m[2], line)
    line = line.replace("``", "")
    return line[:1].upper() + line[1:]
