"""The lean frozen backbone (docs/design.md §3, §3a): a pretrained CNN frozen and
rewritten so that backward through it keeps only packed activation bits, with
an adaptor after every block.

    adapt.py           adapt(): the rewrite of a torchvision ResNet/MobileNetV2 or timm ResNet/EfficientNet
    generic_adapt.py   adapt() for a model of unknown blocks: lean where it can be, adaptors after its stages
    insert_adaptors.py insert_adaptors(): adaptors after modules of any model, chosen by the user
    adaptor_placement.py  where adaptors go: after the blocks of output stride <= adaptor_max_stride
    late_branches.py   where low-rank branches go: beside the blocks of output stride >= branch_min_stride
    kept_bytes.py      kept_bytes_by_part(): what each part of a model keeps for backward; the recompute's transient
    submodules.py      a submodule by its qualified name: its owner, and replacing it
    frozen_conv.py     FrozenConvBNAct: a frozen conv + folded BN + activation
    frozen_blocks.py   FrozenBlock: every supported residual block, frozen and lean
    recomputed_block.py  RecomputedBlock: a frozen block beyond ReLU (SiLU, SE, GELU, LayerNorm) keeps its input
    input_grad_only.py frozen convs and eval BNs that keep nothing for backward (inside a RecomputedBlock)
    autocast_state.py  autocast's state on old and new torch (a recompute runs as its forward ran)
    lean_max_pool.py   LeanMaxPool2d: a max pool that keeps one byte per output element for backward
    shift_calibration.py  calibrate_shifts(): a new domain's BN shifts started from AdaBN's means
    trainable_tail.py  TrainableTail: the last blocks trained in full, within a memory budget
    trainable.py       what a model trains, by parameter group (adaptors, branches, shifts, head, tail)

Built on da2ext.ops and da2ext.nn; the training methods (da2ext.methods) build on it.
"""
