"""imgpipe: the logic behind the Snakemake workflow, importable without Snakemake.

Kept free of heavy imports (torch, cv2) so that the Snakefile can import
imgpipe.workflow.config quickly while building the DAG.
"""

__version__ = "0.1.0"
