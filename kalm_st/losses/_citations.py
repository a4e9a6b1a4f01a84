"""BibTeX entries that the losses' ``citation`` properties put into sentence-transformers' model cards."""

from __future__ import annotations

KALM_V2_BIBTEX = """
@inproceedings{zhao2026iclr-kalmembeddingv2,
  title     = {{KaLM-Embedding-V2: Superior Training Techniques and Data Inspire a Versatile Embedding Model}},
  author    = {Zhao, Xinping and Hu, Xinshuo and Shan, Zifei and Huang, Shouzheng and Zhou, Yao and Zhang, Xin and Sun, Zetian and Liu, Zhenyu and Li, Dongfang and Wei, Xinyuan and Pan, Youcheng and Xiang, Yang and Zhang, Meishan and Wang, Haofen and Yu, Jun and Hu, Baotian and Zhang, Min},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  url       = {https://mlanthology.org/iclr/2026/zhao2026iclr-kalmembeddingv2/}
}
"""

FOCAL_LOSS_BIBTEX = """
@inproceedings{lin2017focal,
  title     = {Focal Loss for Dense Object Detection},
  author    = {Lin, Tsung-Yi and Goyal, Priya and Girshick, Ross and He, Kaiming and Doll{\\'a}r, Piotr},
  booktitle = {Proceedings of the IEEE International Conference on Computer Vision (ICCV)},
  year      = {2017},
  url       = {https://arxiv.org/abs/1708.02002}
}
"""

MOCHI_BIBTEX = """
@inproceedings{kalantidis2020hard,
  title     = {Hard Negative Mixing for Contrastive Learning},
  author    = {Kalantidis, Yannis and Sariyildiz, Mert Bulent and Pion, Noe and Weinzaepfel, Philippe and Larlus, Diane},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2020},
  url       = {https://arxiv.org/abs/2010.01028}
}
"""

GRADCACHE_BIBTEX = """
@inproceedings{gao2021scaling,
  title     = {Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
  author    = {Gao, Luyu and Zhang, Yunyi and Han, Jiawei and Callan, Jamie},
  booktitle = {Proceedings of the 6th Workshop on Representation Learning for NLP (RepL4NLP-2021)},
  year      = {2021},
  url       = {https://arxiv.org/abs/2101.06983}
}
"""

__all__ = ["FOCAL_LOSS_BIBTEX", "GRADCACHE_BIBTEX", "KALM_V2_BIBTEX", "MOCHI_BIBTEX"]
