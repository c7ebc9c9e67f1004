"""Structure families: one package or module per family, each a plug-in (:mod:`.base`).

Registered here, in this order: ``box`` (:mod:`.box`, Structured Convolutions),
``igc`` (:mod:`.igc`, interleaved group convolutions) and ``lowrank``
(:mod:`.lowrank`, two thin layers, for a MAC budget).
"""

from .base import Emitter, Family, LayerInfo, Site, register, registered, resolve, unregister
from .box import BoxFamily
from .igc import InterleavedFamily
from .lowrank import LowRankFamily

BOX = register(BoxFamily())
IGC = register(InterleavedFamily())
LOWRANK = register(LowRankFamily())

__all__ = ["BOX", "IGC", "LOWRANK", "Emitter", "Family", "LayerInfo", "Site", "register", "registered", "resolve",
           "unregister"]
