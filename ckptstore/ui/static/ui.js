// Hovering a point or commit shows its <title> (which commit it is) in a corner box;
// the diff form goes to the static page of the two commits chosen. No framework, no network.
(function () {
  var box = document.getElementById("hover");
  document.querySelectorAll("svg a[data-commit]").forEach(function (a) {
    var title = a.querySelector("title");
    a.addEventListener("mouseenter", function () { box.textContent = title ? title.textContent : ""; box.style.display = "block"; });
    a.addEventListener("mouseleave", function () { box.style.display = "none"; });
  });
  var form = document.getElementById("diff-form");
  if (form) form.addEventListener("submit", function (e) {
    e.preventDefault();
    location.href = "diff/" + form.elements.a.value + ".." + form.elements.b.value + ".html";
  });
})();
