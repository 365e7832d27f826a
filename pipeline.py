"""Generate synthetic chest X-rays from a trained LungGen model (local folder or Hub id).

    python pipeline.py --model lunggen-output --num_images 1000 --output_dir synth/ \
        --scheduler dpmsolver++-3m-sde --num_inference_steps 25 --batch_size 64 --seed 0
    python pipeline.py --model lunggen-output --findings "Cardiomegaly,Effusion" --output_dir synth-cm/
    python pipeline.py --model lunggen-output --labels_from train --num_images 20000 --output_dir synth-labeled/
"""

from lunggen_diffusers.generation.cli import main

if __name__ == "__main__":
    main()
