"""The on-disk layout each reader expects, shown verbatim in error messages and the README."""

from __future__ import annotations

VOC = """\
ROOT/VOCdevkit/VOC2012/            (ROOT/VOC2012/ is accepted too)
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png       palette PNG: 0 background, 1..20 objects, 255 void border
  SegmentationClassAug/<id>.png    optional (SBD, for split 'trainaug'): grey PNG, same ids
  Annotations/<id>.xml             boxes with <difficult>/<truncated> flags
  ImageSets/Segmentation/{train,val}.txt   (+ trainaug.txt or train_aug.txt, optional)
  ImageSets/Main/trainval.txt
ROOT/VOCdevkit/VOC2007/            same, for detection: JPEGImages, Annotations, ImageSets/Main
"""

ADE20K = """\
ROOT/ADEChallengeData2016/         (ROOT may also be ADEChallengeData2016 itself)
  images/training/ADE_train_XXXXXXXX.jpg
  images/validation/ADE_val_XXXXXXXX.jpg
  annotations/training/ADE_train_XXXXXXXX.png     grey PNG: 0 other (ignored), 1..150 classes
  annotations/validation/ADE_val_XXXXXXXX.png
"""

COCOSTUFF = """\
ROOT/
  images/train2017/XXXXXXXXXXXX.jpg
  images/val2017/XXXXXXXXXXXX.jpg
  stuffthingmaps_trainval2017/train2017/XXXXXXXXXXXX.png   grey PNG: ids 0..181, 255 unlabeled
  stuffthingmaps_trainval2017/val2017/XXXXXXXXXXXX.png
  (or annotations/{train2017,val2017}/XXXXXXXXXXXX_labelTrainIds.png, mmseg's 0..170 ids)
"""

COCO20K = """\
ROOT/
  train2014/COCO_train2014_XXXXXXXXXXXX.jpg       (or images/train2014/...)
  annotations/instances_train2014.json
  coco_20k_filenames.txt                          optional; else the package's copy
"""

IMAGEFOLDER = """\
ROOT/<class>/.../<image>.{jpg,jpeg,png,bmp,ppm,pgm,tif,tiff,webp}   (class folders optional;
ROOT/<image>.jpg                                                     any depth)
"""
