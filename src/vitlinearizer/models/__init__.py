"""Student models, registered with timm on import (``timm.create_model("adventurer_small_patch16_224")``)."""
from .adventurer import Adventurer, AdventurerBlock
from .mixers import MIXERS, GLAMixer, HGRNMixer, Mamba2Mixer, create_mixer

__all__ = ["Adventurer", "AdventurerBlock", "MIXERS", "GLAMixer", "HGRNMixer", "Mamba2Mixer", "create_mixer"]
