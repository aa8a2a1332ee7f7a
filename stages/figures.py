"""DVC stage `figures`: the paper's two illustrations from the pipeline's own data and models:
the DFT spectra of the ME views (Fig. 6), and per FPN level the teacher's attention, DMKD's
masks and the student's reconstruction (dfmsd.explain)."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--run', required=True, help="a SAL method's final model directory")
    parser.add_argument('--teacher', required=True, help="that stage's teacher model directory")
    parser.add_argument('--out', required=True, help='figures directory')
    args = parser.parse_args()

    from dfmsd.core.params import ME, Data, Figures, section, stage_params
    from dfmsd.explain import attention_figure, spectra_figure

    p = stage_params()
    data, fig = section(Data, p['data'], 'data'), section(Figures, p['figures'], 'figures')
    spectra_figure(data, section(ME, p['me'], 'me'), f'{args.out}/me_spectra.png', images=fig.images, seed=fig.seed)
    attention_figure(data, args.run, args.teacher, f'{args.out}/attention_masks.png', seed=fig.seed)
    print(f'[figures] {args.out}/me_spectra.png, {args.out}/attention_masks.png')


if __name__ == '__main__':
    cli.run(main)
