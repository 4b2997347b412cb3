"""The machine the planner models: one device's peak and memory, the interconnect, one efficiency constant.

Every number the planner uses about hardware is here, once; docs/planner.md explains where each comes from.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
MIB = 2 ** 20

# The one efficiency constant: the fraction of `peak_tflops` a device sustains on the model's own FLOPs
# (matmuls, attention, elementwise work and kernel gaps all folded in). It is not fitted per model: one
# value reproduces the published fine-tuning throughput of TeleChat2-7B, 35B and 115B within 20%
# (tests/test_plan.py::test_calibration, docs/planner.md).
EFFICIENCY = 0.75


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float          # dense bf16/fp16 TFLOPS per device
    hbm_gb: float               # device memory
    reserved_gb: float          # runtime, HCCL buffers, workspaces, fragmentation: not for the model
    devices_per_node: int       # devices joined by the intra-node fabric
    link_gb_s: float            # intra-node: one direction of one link of the full mesh (HCCS)
    network_gb_s: float         # inter-node: one direction of one device's NIC (RoCE)
    hbm_gb_s: float             # device memory bandwidth (memory-bound recomputation)
    efficiency: float = EFFICIENCY

    @property
    def budget_gb(self) -> float:
        """Device memory the model may use (MindSpore's `max_device_memory`)."""
        return self.hbm_gb - self.reserved_gb

    def with_(self, **changes) -> "Hardware":
        return replace(self, **changes)

    def group_bandwidth(self, size: int, span: int) -> float:
        """Bytes/s one device sends in a collective over `size` devices lying within `span` consecutive ranks.

        Ranks are numbered node by node (msrun), so a group inside one node (`span <= devices_per_node`)
        talks over the full mesh: each device drives its `size - 1` links at once. Otherwise the traffic
        leaves the node through the device's own NIC.
        """
        if size <= 1:
            return float("inf")
        if span <= self.devices_per_node:
            return (size - 1) * self.link_gb_s * GB
        return self.network_gb_s * GB

    def p2p_bandwidth(self, span: int) -> float:
        """Bytes/s of a point-to-point send between neighbours of a group within `span` ranks: a link or the NIC."""
        return (self.link_gb_s if span <= self.devices_per_node else self.network_gb_s) * GB

# Atlas 800T A2: 8 x Ascend 910B per node, HCCS full mesh (7 links of 56 GB/s bidirectional per device),
# one 200 Gb/s RoCE port per device, ~1.6 TB/s HBM. 295 TFLOPS is the 910B3's dense bf16 peak (910B2: ~354).
# Link and NIC numbers are ~90% of the nominal one-direction rates (28 GB/s, 25 GB/s); 6 GB of 64 are left to the
# runtime, as MindFormers' `max_device_memory: 58GB` does.
ATLAS_800T_A2 = Hardware(name="Atlas 800T A2 (Ascend 910B, 64 GB)", peak_tflops=295.0, hbm_gb=64.0,
                         reserved_gb=6.0, devices_per_node=8, link_gb_s=25.0, network_gb_s=22.0,
                         hbm_gb_s=1600.0)


@dataclass(frozen=True)
class HostRuntime:
    """Peak resident memory of `telechat2 train` on a CPU (MindSpore 2.9, x86_64), beyond the tensors the
    model itself accounts for. Measured by `python -m telechat2.plan.calibrate_cpu` on sizes other than the
    tiny model (1 and 8 layers at hidden 64; 1 and 2 layers at hidden 1024), then checked on the tiny model
    (tests/test_plan.py)."""
    runtime_mb: float               # Python + MindSpore + telechat2 + the MindRecord pipeline, model built
    compile_mb_per_layer: float     # graph mode: the compiler's memory per decoder layer of the jitted step
    bytes_per_param: float          # weights, gradient buffers, AdamW moments and the step's temporaries


# context.mode 0 (the step under ms.jit) and 1 (PyNative); fitted on this 2-core x86_64 machine, MindSpore 2.9.0.
# Graph mode: 24 bytes per parameter (bench/train_memory.py, 109M parameters: 3.24 GiB peak; 16 are weights,
# gradient shards and AdamW moments, 4 the micro-batch gradients before reduction, the rest the update's
# temporaries; it was 106 before the optimizer went bucket by bucket without full-size divisions), PyNative ~23.
HOST_GRAPH = HostRuntime(runtime_mb=457.0, compile_mb_per_layer=72.0, bytes_per_param=24.0)
HOST_PYNATIVE = HostRuntime(runtime_mb=456.0, compile_mb_per_layer=0.0, bytes_per_param=23.0)
