"""Cloud TPU emulated with local processes: a `gcloud` stand-in (fake_gcloud.py), a cheap distributed job
(fake_job.py), the workers' install step for tests (install.py) and a script that pushes a small grid through it
(run_grid.py)."""
