"""Complete, copyable training sessions: shown by ``ceremony run --help`` and in the README.

A test checks that both examples load, pass ``ceremony run --dry-run``'s checks, and appear
verbatim in README.md, so the help, the README and the code cannot drift apart.
"""

from __future__ import annotations

__all__ = ["IMAGING_SESSION", "SITE_DATA", "TABULAR_SESSION", "TRAINING_HELP"]

TABULAR_SESSION = """\
[operator]
cert = "operator/ceremony-operator.pem"
key = "operator/ceremony-operator.key"
ca = "ca.pem"
roster = "roster.json"

[session]
participants = ["hospital-a", "hospital-b", "hospital-c"]
# rounds = 5 and bits = 64 follow from the payload: leave them out

[session.payload]
kind = "training"
model = "mlp"                 # logreg | mlp | cnn (images) | declared (model_file)
hidden = [16]                 # mlp: widths of the hidden Dense layers
input_dim = 30                # features per record (each site's data must have them)
training_rounds = 3           # the session adds a standardization and an evaluation round
local_steps = 20              # DP-SGD steps per site per round
batch_size = 16               # expected Poisson batch (sampling rate = batch / records)
lr = 0.5                      # local learning rate
clip_norm = 1.0               # per-example gradient clipping norm C
noise_multiplier = 1.2        # DP-SGD noise sigma (std = sigma * C); more = smaller epsilon
max_records = 100000          # bound on a site's training records (sites above refuse)
feature_bound = 1000.0        # |feature| bound for the noisy standardization (or a list)
loss_bound = 5.0              # per-example loss clip for the released evaluation
standardize_noise = 8.0       # Gaussian noise multiplier of the standardization sums
eval_noise = 5.0              # Gaussian noise multiplier of the evaluation sums
histogram_bins = 20           # score histogram cells released (ROC, calibration)
delta = 1e-5                  # DP-SGD delta of the session's training
# weights = { hospital-a = 1.0, hospital-b = 0.5, hospital-c = 1.0 }
                              # public update weights in (0, 1] (default 1 for everyone)
"""

IMAGING_SESSION = """\
[operator]
cert = "operator/ceremony-operator.pem"
key = "operator/ceremony-operator.key"
ca = "ca.pem"
roster = "roster.json"

[session]
participants = ["hospital-a", "hospital-b", "hospital-c"]
prepare_seconds = 300         # time each site may take to train before a round's keys

[session.payload]
kind = "training"
model = "cnn"                 # image normalized, 3x3 Conv2D + max pooling per filter, Dense head
filters = [8, 16]             # cnn: Conv2D widths
hidden = [16]                 # cnn: Dense widths before the logit
image = { size = [32, 32], channels = 1, normalization = "max_value" }
                              # every site decodes its own DICOM/PNG/JPEG files this way
# model = "declared" with model_file = "model.json" trains your own Keras architecture
# (keras.Sequential([...]).to_json(); no Lambda, no custom objects; each site checks it)
training_rounds = 3
local_steps = 15
batch_size = 32
lr = 0.5
clip_norm = 1.0
noise_multiplier = 1.0
max_records = 10000
loss_bound = 5.0
eval_noise = 2.0
"""

SITE_DATA = """\
# In each hospital's own peer configuration (never in the session):
[data]                        # images: a folder and a labels CSV (file,label)
source = "images"
folder = "scans"
labels = "scans/labels.csv"
image_size = [32, 32]         # the session's image table overrides size and normalization
split = { test_fraction = 0.2 }

[policy.models]               # which declared models this site trains
allowed_layers = ["InputLayer", "Conv2D", "MaxPooling2D", "GlobalMaxPooling2D", "Dense"]
max_parameters = 200000
"""

TRAINING_HELP = f"""\
A training session (federated DP-SGD), tabular:

{TABULAR_SESSION}
An imaging session (the [operator] table as above):

{IMAGING_SESSION}
The data never appears in a session: each site names its own source, and its own limits
on declared models, in its peer configuration:

{SITE_DATA}
Check a file before proposing it (model size, data shape, epsilon per site):
  ceremony run --federation federation.toml --dry-run [--records hospital-a=450 ...]
"""
