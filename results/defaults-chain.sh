#!/usr/bin/env bash
# The bare commands of the README, one after another, in a fresh clone with an empty cache.
set -u
cd "${1:?usage: results/defaults-chain.sh CLONE_DIR}"
export MMSSL_CACHE=${MMSSL_CACHE:-$PWD/.cache-defaults}
OUT=${OUT:-$PWD/defaults.tsv}; LOGS=${LOGS:-$PWD}
: > $OUT
run() {  # name, eval kind, pretrain args...
  name=$1; kind=$2; shift 2
  R=runs/$name
  t0=$(date +%s)
  .venv/bin/mmssl pretrain "$@" run_dir=$R > $LOGS/chain-$name.log 2>&1
  rc=$?
  if [ $kind = probe ]; then
    .venv/bin/mmssl eval linear-probe encoder=$R out=$R/eval >> $LOGS/chain-$name.log 2>&1
    res=$(.venv/bin/python -c "import json; r=json.load(open('$R/eval/linear_probe.json')); print(f\"{r['accuracy']:.3f}\t{r['random_init_accuracy']:.3f}\t{r.get('features_baseline_accuracy')}\")" 2>/dev/null)
  else
    .venv/bin/mmssl eval retrieval encoder=$R out=$R/eval >> $LOGS/chain-$name.log 2>&1
    .venv/bin/mmssl eval zero-shot encoder=$R out=$R/eval >> $LOGS/chain-$name.log 2>&1
    res=$(.venv/bin/python -c "
import json; r=json.load(open('$R/eval/retrieval.json')); z=json.load(open('$R/eval/zero_shot.json'))
print(f\"{r['i2t_R@1']:.3f}/{r['t2i_R@1']:.3f}\t{r['random_init_i2t_R@1']:.3f}/{r['random_init_t2i_R@1']:.3f}\tzs {z['accuracy']:.3f} ({z['random_init_accuracy']:.3f})\")" 2>/dev/null)
  fi
  t1=$(date +%s)
  steps=$(grep -o '[0-9]* steps,' $LOGS/chain-$name.log | head -1)
  printf "%s\t%s\trc=%s\t%s\t%ss\t%s\n" "$name" "$*" "$rc" "$steps" "$((t1-t0))" "$res" >> $OUT
}
run speech-hubert probe modality=speech objective=hubert
run image-mae probe modality=image objective=mae
run text-mae probe modality=text objective=mae
run point-mae probe modality=point objective=mae
run eeg-mae probe modality=eeg objective=mae
run image-data2vec probe modality=image objective=data2vec
run image-distill probe modality=image objective=distill
run clip pair 'modality=[image,text]' objective=clip
run mri-mae probe modality=mri objective=mae
run eeg-data2vec probe modality=eeg objective=data2vec
run speech-data2vec probe modality=speech objective=data2vec
run cloob pair 'modality=[image,text]' objective=cloob
run clap pair 'modality=[speech,text]' objective=clap
run speech-mae probe modality=speech objective=mae
run speech-distill probe modality=speech objective=distill
run eeg-distill probe modality=eeg objective=distill
echo done >> $OUT
