"""The Kubernetes side: submit, wait for, follow and clean up finetune-job MPIJobs."""
