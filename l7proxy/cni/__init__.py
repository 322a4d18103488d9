"""The CNI plugin (`l7proxy-cni`) and its installer: containers as the agent's endpoints."""
