"""Training, top-down:

    workflow.py         a work directory of learned domains; build_model, learn_domain,
                        load_saved_domains: what `python -m da2ext train` and `eval` run
    loop.py             train_domain and evaluate: one training loop for every method
    lr_schedule.py      the rate's linear warmup, then one cosine
    loop_graph.py       the loop's steps replayed from a CUDAGraphStep (--cuda-graph)
    cuda_graph_step.py  CUDAGraphStep: a whole training step captured as one CUDA graph
    distributed.py      DistributedRun: one domain learned by a torch.distributed group

workflow.py calls down into da2ext.data (the loaders), da2ext.models (the
backbone), da2ext.domains (the model and its files) and loop.py; nothing below
it calls back into it.
"""
from .loop import NonFiniteTrainingError, evaluate, train_domain

__all__ = ["NonFiniteTrainingError", "evaluate", "train_domain"]
