"""Many domains on one frozen backbone, and what goes to disk:

    multidomain.py   MultiDomainModel: named domains, each owning what its method trains
    domain_file.py   a domain's tensors and metadata as one safetensors (or .npz) file
    checkpoint.py    a training run's checkpoint, to resume it after an interruption
    atomic_file.py   writes that an interruption cannot leave half done
    run_lock.py      one training run per domain and work directory at a time
    safe_load.py     torch.load that runs no code from the file (checkpoints, and the
                     backbones' weight files)
"""
