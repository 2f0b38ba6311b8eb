"""kNN evaluation of a frozen encoder (cosine similarity, temperature-weighted votes).

Features of the training split (resize + centre crop, no augmentation) vote for the
classes of the test images: the k most similar vote with weight exp(sim / T), as in
Wu et al. (2018) and the SSL literature (k = 20 and 200, T = 0.07 by default).
"""
from corinfomax_tf.evaluation import probes

RESULT_FILE = "knn_eval.json"


def run_knn_eval(encoder, source, *, image_size, ks=(20, 200), temperature=0.07):
  """{"k20_top1": ..., ...} in percent, with the split sizes."""
  train_x, train_y = probes.extract_features(encoder, probes.eval_images(source.train,
                                                                         image_size))
  test_x, test_y = probes.extract_features(encoder, probes.eval_images(source.test,
                                                                       image_size))
  probes.check_labels(train_y, source.num_classes, "train_split")
  probes.check_labels(test_y, source.num_classes, "test_split")
  result = probes.knn_evaluate(train_x, train_y, test_x, test_y, source.num_classes,
                               ks=ks, temperature=temperature)
  return {**result, "temperature": temperature, "num_train": source.num_train,
          "num_test": source.num_test, "num_classes": source.num_classes}
