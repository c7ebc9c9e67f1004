"""Structure families: one package or module per family, each a plug-in (:mod:`.base`).

Registered here, in this order: ``box`` (:mod:`.box`, Structured Convolutions).
"""

from .base import Emitter, Family, LayerInfo, Site, register, registered, resolve, unregister
from .box import BoxFamily

BOX = register(BoxFamily())

__all__ = ["BOX", "Emitter", "Family", "LayerInfo", "Site", "register", "registered", "resolve",
           "unregister"]
