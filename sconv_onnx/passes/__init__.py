"""Structure families: one package or module per family, each a plug-in (:mod:`.base`).

Registered here, in this order: ``box`` (:mod:`.box`, Structured Convolutions) and
``lowrank`` (:mod:`.lowrank`, two thin layers, for a MAC budget).
"""

from .base import Emitter, Family, LayerInfo, Site, register, registered, resolve, unregister
from .box import BoxFamily
from .lowrank import LowRankFamily

BOX = register(BoxFamily())
LOWRANK = register(LowRankFamily())

__all__ = ["BOX", "LOWRANK", "Emitter", "Family", "LayerInfo", "Site", "register", "registered", "resolve",
           "unregister"]
