"""SGLang servers as processes and over HTTP: launching (server.py), the router (router.py), the
control endpoints used for weight sync (control.py), CPU support (cpu_support.py and the sgl_kernel
stand-in), API keys (auth.py) and orphan cleanup (orphans.py). A leaf: it knows nothing of the learner,
of checkpoints or of the RL loop."""
