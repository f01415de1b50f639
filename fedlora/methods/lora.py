"""Dense federated LoRA (paper Algorithm 4 in FL form): no masks, rank is the only knob."""

from fedlora.methods.base import Server


class LoRA(Server):
    pass
