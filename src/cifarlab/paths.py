"""Where each stage writes. dvc.yaml declares the same paths as outs, metrics and plots."""

from pathlib import Path

DATA_DIR = Path("data")

LR_FIND_METRICS = Path("metrics/lr_find.json")      # suggested max LR, per-rule values
LR_FIND_CURVE = Path("plots/lr_find.csv")           # lr, loss
MAX_LR = Path("metrics/max_lr.json")                # the max LR train uses (train.max_lr resolved): train's dep

TRAIN_LIVE_DIR = Path("metrics/train")              # dvclive: metrics.json + per-epoch plots
TRAIN_LOGGED = ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr")   # its per-epoch series
TRAIN_SPEED = Path("metrics/train_speed.json")      # images/s and epoch seconds, apart from learning metrics
TRAIN_SUMMARY = Path("metrics/training.json")      # declared metrics: max LR used, epochs, images/s, minutes
LR_SCHEDULE = Path("plots/lr_schedule.csv")         # step, lr actually used for every batch
TIME_TO_ACCURACY = Path("plots/time_to_accuracy.csv")   # epoch, cumulative training seconds, test accuracy
AUGMENT_PREVIEW = Path("plots/augmentation.png")    # the same training images before and after augmentation
CHECKPOINT = Path("models/model.pt")
TRAIN_STATE_DIR = Path(".cache/train")              # <run fingerprint>.pt: full state after every epoch, for
                                                    # resume; dvcignored, git-ignored, deleted when the run completes

EVAL_METRICS = Path("metrics/evaluate.json")        # test accuracy/loss (+ TTA beside them), per-class accuracy
EVAL_RUN = Path("metrics/evaluate_run.json")        # evaluate's wall times, runtime, params and gallery sizes
TEST_SUMMARY = Path("metrics/test.json")             # declared metrics: test accuracy and loss (+ TTA)
PER_CLASS = Path("plots/per_class.csv")             # class, accuracy: a bar per class and revision
CONFUSION = Path("plots/confusion.csv")             # actual, predicted per test image
CONFUSION_FIGURE = Path("plots/confusion.png")
PER_CLASS_FIGURE = Path("plots/per_class.png")
MISCLASSIFIED_FIGURE = Path("plots/misclassified.png")
GRADCAM_FIGURE = Path("plots/gradcam.png")          # Grad-CAM over the most confident mistakes

REPORT_DIR = Path("reports")
