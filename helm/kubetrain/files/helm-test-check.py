from trainer.config import load_trainer_config
from trainer.tasks import get_task
config = load_trainer_config("/etc/kubetrain/config.json")
if config.training.task != "custom":
    get_task(config.training.task)
print(f"kubetrain config for {config.experiment} is valid (task {config.training.task})")
