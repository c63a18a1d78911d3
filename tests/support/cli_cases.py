"""Bad command lines and config values, each with the one error line it must give (the cases of
tests/fedsim/test_cli_errors.py, listed with the corpus in the docs)."""

from __future__ import annotations

CASES = [
    (["--model", "resnet"], "unknown model 'resnet'; choose one of: cloze, cnn6, cnn6-d, cnn6-relu"),
    (
        ["--dataset", "cifar10"],
        "unknown dataset 'cifar10'; choose one of: breast-cancer, digits, fashion-mnist, fortunes",
    ),
    (
        ["--dataset", "breast-cancer", "--model", "cnn6"],
        "model 'cnn6' takes image inputs, not features ('breast-cancer' holds features); "
        "pick a model that does: dam-mlp, ledl, mlp, random-features, text-dnn",
    ),
    (["--dataset", "breast-cancer", "--image-size", "32"], "holds features; pass --image-size 0"),
    (["--strategy", "fedsgdx"], "unknown strategy 'fedsgdx'; choose one of: fedavg, fedprox"),
    (["--rounds", "0"], "rounds must be in [1, 100000] (got 0)"),
    (
        ["--model", "protopnet", "--secagg", "--clients", "3"],
        "--secagg with model 'protopnet': its server-side step reads each client's extra records",
    ),
    (
        ["--model", "hybrid-sc", "--defence", "dp-sgd"],
        "dp-sgd with model 'hybrid-sc': its loss couples the samples of a batch",
    ),
    (
        ["--model", "dam-mlp", "--defence", "dp-sgd"],
        "dp-sgd cannot train model 'dam-mlp': Opacus computes no per-sample gradient for a trainable "
        "layer that keeps buffers (layers.3, layers.6)",
    ),
    (
        ["--model-options", "widht=3"],
        "model 'mlp' has no option 'widht'; its options (defaults): hidden=128, depth=2, head=ce",
    ),
    (["--model-options", "depth=1.5"], "model option depth='1.5' of 'mlp' is not a whole number"),
    (["--model-options", "depth"], "model option 'depth' is not key=value; write e.g. hidden=128"),
    (["--model-options", "depth=1,depth=2"], "model option 'depth' is given twice"),
    (["--model-options", "hidden=0"], "model 'mlp' cannot be built with options 'hidden=0': mlp needs"),
    (
        ["--model", "cnn6", "--image-size", "32", "--model-options", "width=3"],
        "model 'cnn6' has no option 'width'",
    ),
    (["--rounds", "-3"], "rounds must be in [1, 100000] (got -3)"),
    (["--partitioner", "dirichlet", "--alpha", "0"], "alpha must be > 0 (got 0.0)"),
    (["--partitioner", "dirichlet", "--alpha", "-1"], "alpha must be > 0 (got -1.0)"),
    (["--clients", "5000"], "5000 clients but only 1437 training samples; use at most 1437 clients"),
    (
        ["--strategy", "krum", "--clients", "3", "--num-malicious", "1"],
        "Krum with 1 malicious clients needs more",
    ),
    (["--fraction-train", "1.5"], "fraction-train must be in (0, 1] (got 1.5); pass --fraction-train in"),
    (["--momentum", "-0.5"], "momentum must be at least 0 (got -0.5); pass --momentum 0 or more"),
    (["--num-malicious", "-1"], "num-malicious must be at least 0 (got -1)"),
    (["--strategy", "fedadam", "--server-learning-rate", "0"], "server-learning-rate must be > 0 (got 0.0)"),
    (["--image-size", "100000"], "image size 100000 is out of range; pass 4 to 256 pixels"),
    (
        ["--partitioner", "pathological", "--classes-per-client", "1", "--clients", "1437"],
        "the pathological split leaves",
    ),
    (["--partitioner", "covariate"], "per-sample covariate, which this dataset does not carry"),
    (["--cpus", "0"], "--cpus must be at least 1 (got 0); leave it out to use every core"),
    (["--stop-after", "0"], "--stop-after must be at least 1"),
    (["--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    # values that are not finite, whatever the knob
    (["--learning-rate", "inf"], "learning-rate must be a finite number (got inf)"),
    (["--momentum", "inf"], "momentum must be a finite number (got inf)"),
    (["--alpha", "inf"], "alpha must be a finite number (got inf)"),
    (["--proximal-mu", "-inf"], "proximal-mu must be a finite number (got -inf)"),
    (["--learning-rate", "nan"], "learning-rate must be a finite number (got nan)"),
    (["--trim-beta", "nan"], "trim-beta must be a finite number (got nan)"),
    (["--fraction-evaluate", "nan"], "fraction-evaluate must be a finite number (got nan)"),
    # seeds numpy's SeedSequence and torch.manual_seed both accept
    (["--seed", "-1"], "seed must be in [0, 4294967295] (got -1)"),
    (["--seed", "4294967296"], "seed must be in [0, 4294967295] (got 4294967296)"),
    (["--rounds", "2", "--stop-after", "5"], "--stop-after 5 is beyond the run's 2 rounds; pass at most 2"),
    (["--audit-attacks", "telepathy"], "unknown attack(s) telepathy; choose from"),
    (["--seed", "1" + "0" * 30], "seed must be in [0, 4294967295] (got 1000000000000000000000000000000)"),
    # control characters in names and strings (argv cannot hold NUL; files can, see below)
    (["--name", "a\x1bb"], "name 'a\\x1bb' contains the control character '\\x1b'"),
    (["--name", "a\nb"], "name 'a\\nb' contains the control character '\\n'"),
    (["--audit-attacks", "layerwise\tdlg"], "audit-attacks 'layerwise\\tdlg' contains the control character"),
    (["--name", ""], "name is empty; pass a non-empty value"),
    (["--name", "../up"], "run name '../up' is not a plain folder name"),
    # defences: Flower's constraints on central DP, and the privacy knobs' ranges
    (["--central-dp", "server", "--strategy", "krum"], "central DP needs plain FedAvg aggregation"),
    (["--central-dp", "client", "--strategy", "fedadam"], "not fedadam; pass --strategy fedavg"),
    (["--central-dp", "server", "--noise-multiplier", "0"], "central DP with --noise-multiplier 0"),
    (
        ["--central-dp", "server", "--adaptive-clipping", "--clients", "5", "--noise-multiplier", "1"],
        "adaptive clipping with 5 clients per round cannot reach noise multiplier 1",
    ),
    (["--central-dp", "everywhere"], "unknown central-dp 'everywhere'; choose one of: off, server, client"),
    (["--target-delta", "1"], "target-delta must be in (0, 1) (got 1.0)"),
    (["--target-delta", "0"], "target-delta must be in (0, 1) (got 0.0)"),
    (["--target-epsilon", "-1"], "target-epsilon must be at least 0 (got -1.0)"),
    (["--clipping-norm", "0"], "clipping-norm must be > 0 (got 0.0)"),
    (["--noise-multiplier", "-1"], "noise-multiplier must be at least 0 (got -1.0)"),
    (["--keep", "0"], "keep must be in (0, 1] (got 0.0)"),
]


CONFIG_VALUE_CASES = [
    (".toml", "learning-rate = inf\n", "learning-rate must be a finite number (got inf)"),
    (".toml", "momentum = nan\n", "momentum must be a finite number (got nan)"),
    (".toml", "alpha = -inf\n", "alpha must be a finite number (got -inf)"),
    (".toml", "seed = -1\n", "seed must be in [0, 4294967295] (got -1)"),
    (".toml", 'name = "a\\u0000b"\n', "name 'a\\x00b' contains the control character '\\x00'"),
    (".toml", 'dataset = "digits\\u0000"\n', "dataset 'digits\\x00' contains the control character"),
    (".json", '{"alpha": Infinity}', "alpha must be a finite number (got inf)"),
    (".json", '{"learning-rate": NaN}', "learning-rate must be a finite number (got nan)"),
    (".json", '{"name": "run\\u0000x"}', "name 'run\\x00x' contains the control character '\\x00'"),
    (
        ".toml",
        "clients = 2\nnum-clients = 5\nnum_clients = 7\n",
        "sets clients 3 times, as 'clients', 'num-clients', 'num_clients'; keep one (`clients = ...`)",
    ),
    (".json", '{"learning-rate": 0.1, "learning_rate": 0.2}', "sets learning-rate 2 times"),
]


AUDIT_CASES = [
    (["--gradient-noise", "-1"], "--gradient-noise must be a finite number >= 0 (got -1.0); pass 0 for"),
    (["--gradient-noise", "nan"], "--gradient-noise must be a finite number >= 0 (got nan)"),
    (["--gradient-noise", "inf"], "--gradient-noise must be a finite number >= 0 (got inf)"),
    (
        ["--model", "cloze"],
        "model 'cloze' takes tokens inputs, not image ('digits'); "
        "pass --dataset one of: fortunes, fortunes-minilm, fortunes-smollm2, kjv",
    ),
    (
        ["--model", "cnn6", "--dataset", "fortunes"],
        "model 'cnn6' takes image inputs, not tokens ('fortunes'); "
        "pass --dataset one of: digits, fashion-mnist, mnist, photos, splash, splash-body",
    ),
    (["--model", "mlp", "--dataset", "nope"], "unknown dataset 'nope'; choose one of: breast-cancer, digits"),
]
