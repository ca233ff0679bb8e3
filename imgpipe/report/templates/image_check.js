
window.addEventListener("load", function () {
  var ok = 0, broken = 0;
  document.querySelectorAll("img").forEach(function (img) {
    var good = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-ok", good ? "1" : "0");
    if (good) { ok++; } else { broken++; }
  });
  var box = document.getElementById("imgcheck");
  box.setAttribute("data-ok", ok);
  box.setAttribute("data-broken", broken);
  box.textContent = ok + " images shown, " + broken + " broken";
});

