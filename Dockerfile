# se-ray on GPUs: Ray 2.60 (Python 3.11, CUDA 12.8) + vLLM + se-ray[gpu].
#
#   docker build -t ghcr.io/se-ray/se-ray:0.1.0-gpu .
#   docker push ghcr.io/se-ray/se-ray:0.1.0-gpu
#
# Used by cluster/kuberay/*.yaml and cluster/autoscaler/*.yaml. The job configs travel
# with the image under /home/ray/se-ray/jobs/configs. No credentials are baked in:
# HF_TOKEN and object-store credentials come from the cluster at run time.
FROM rayproject/ray:2.60.0-py311-cu128

# The base image runs as the unprivileged user `ray` (uid 1000) with Python in
# /home/ray/anaconda3, so pip needs no root and the image stays non-root.
USER ray
WORKDIR /home/ray/se-ray

ENV HF_HOME=/home/ray/.cache/huggingface \
    VLLM_WORKER_MULTIPROC_METHOD=spawn \
    TOKENIZERS_PARALLELISM=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, in their own layer, so editing se-ray's code does not reinstall
# torch and vLLM: the metadata alone decides what they are.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p se_ray && touch se_ray/__init__.py \
 && pip install --no-cache-dir ".[gpu]" \
 && pip uninstall -y se-ray \
 && rm -rf se_ray build ./*.egg-info

# Then the package and the job configs (COPY by name: the local virtualenv, outputs and
# git metadata never enter the image). Editable, so the code imported is the code in
# /home/ray/se-ray: `ray up` rsyncs a checkout over it, and data files beside the modules
# (se_ray/demo/) are found.
COPY --chown=ray:users se_ray/ se_ray/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users cluster/ cluster/
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import se_ray, ray; assert ray.__version__.startswith('2.60'), ray.__version__" \
 && se-ray --help > /dev/null
